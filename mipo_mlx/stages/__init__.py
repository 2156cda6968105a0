"""The stages of a run, each a function over a `Run`: pairs, reference, training, evaluation."""
