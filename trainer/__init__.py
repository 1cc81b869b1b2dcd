"""The design's ``trainer`` (dataset over the cache, models, losses, metrics, loop, checkpoints; and,
apart, inference: predictor, predict, evaluate, visualization, export), kept at the checkout's root
as a name only: the code is ``roiseg.loader``, ``roiseg.modeling``, ``roiseg.evaluation`` and
``roiseg.training``, and for inference ``roiseg.runtime``, ``roiseg.inference`` and ``roiseg.export``
(see ``roiseg/__init__.py`` for the layers).  Re-exports for scripts that import ``trainer``; the
wheel installs ``roiseg`` alone."""
from roiseg.inference.evaluate import evaluate_checkpoint
from roiseg.inference.torch_decoder import predictor_from_checkpoint
from roiseg.runtime.predict import PredictOptions, run_predict
from roiseg.training.config import TrainConfig, make_config
from roiseg.training.loop import Trainer
from roiseg.training.run import run_training

__all__ = ["PredictOptions", "TrainConfig", "Trainer", "evaluate_checkpoint", "make_config", "predictor_from_checkpoint",
           "run_predict", "run_training"]
