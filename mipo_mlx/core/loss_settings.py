"""The settings a preference loss takes, and which of them each loss honours: the loss
registry's contract (`engine.losses.LOSSES` holds the functions; tests/test_losses.py checks
each one against this table), read without mlx so that `settings.validate` refuses a setting
the chosen loss would ignore before any slow stage. The loss names the settings accept are
this table's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import UserError


@dataclass(frozen=True)
class LossSettings:
    """The training.<setting>s a loss function takes; each loss honours some of them (HONOURS)."""

    beta: float = 0.1
    label_smoothing: float = 0.0

    @classmethod
    def of(cls, training) -> LossSettings:
        """The settings of a TrainingConfig."""
        return cls(**{name: getattr(training, name) for name in LOSS_SETTINGS})


LOSS_SETTINGS = tuple(f.name for f in fields(LossSettings))
HONOURS: dict[str, tuple[str, ...]] = {
    "sigmoid": ("beta", "label_smoothing"),  # conservative DPO
    "robust": ("beta", "label_smoothing"),  # the label-flip rate
    "hinge": ("beta",),
    "ipo": ("beta",),
    "sppo_hard": ("beta",),
    "nca_pair": ("beta",),
    "sft": ("beta",),  # not in its loss: it scales the rewards reported beside DPO runs'
}


def check_loss_settings(training) -> None:
    """Refuse a training.<setting> off its default that training.loss would ignore."""
    defaults = type(training)()
    for name in LOSS_SETTINGS:
        value = getattr(training, name)
        if name not in HONOURS[training.loss] and value != getattr(defaults, name):
            users = ", ".join(loss for loss, honoured in HONOURS.items() if name in honoured)
            raise UserError(
                f"training.{name}={value} has no effect on training.loss={training.loss} (only "
                f"{users} use it); leave it at {getattr(defaults, name)} or choose one of those "
                "losses"
            )
