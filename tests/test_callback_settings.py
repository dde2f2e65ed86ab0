"""Every callback setting (and predict's sampling settings) is typed for jsonargparse: a bad value is refused at parse time,
before any model is built, with one error naming the key; the same checks hold for Python
callers (ConfigError). The CLI cases run the CLI's main() in-process."""

from __future__ import annotations

import inspect
import time
from typing import Literal, Union, get_type_hints

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt

from iddpm_lightning.callbacks import FID, BitsPerDim, ImportanceSampler, SampleGrid
from iddpm_lightning.sampling import Sampling
from iddpm_lightning.settings import Features, MetricSampleCount, Respacing, Sampler, SampleSteps, SolverOrder
from iddpm_lightning.errors import ConfigError

from .test_fid import TinyExtractor

CALLBACKS = [FID, BitsPerDim, ImportanceSampler, SampleGrid, Sampling]
ADD = "--trainer.callbacks+=iddpm_lightning.callbacks."

# (what is wrong, extra arguments, the setting named in the error). digits.yaml's callbacks are
# [SampleGrid, BitsPerDim, FID]: ``--trainer.callbacks.X`` sets X of the last one.
CLI_CASES = {
    "ImportanceSampler unit interval": ([f"{ADD}ImportanceSampler", "--trainer.callbacks.uniform_prob=2"],
                                        "uniform_prob"),
    "FID choice": ([f"{ADD}FID", "--trainer.callbacks.reference_split=test"], "reference_split"),
    "BitsPerDim positive int": ([f"{ADD}BitsPerDim", "--trainer.callbacks.num_strata=0"], "num_strata"),
    "FID features choice": (["--trainer.callbacks.features=clip"], "features"),
    "FID too few samples": (["--trainer.callbacks.num_samples=3"], "num_samples"),
    "SampleGrid choice (YAML init_args)": (["--config", "{tmp}/grid.yaml"], "sampler"),
    "sampling choice": (["--sampling.sampler=foo"], "sampling.sampler"),
    "sampling positive int": (["--sampling.num_samples=0"], "sampling.num_samples"),
    "sampling non-positive sample_steps": (["--sampling.sample_steps=0"], "sampling.sample_steps"),
}

GRID_YAML = """\
trainer:
  callbacks:
    - class_path: iddpm_lightning.callbacks.SampleGrid
      init_args:
        every_n_steps: 10
        sampler: euler
"""


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_callback_setting_fails_at_parse_time_naming_it(tmp_path, digits_config, case, run_main):
    """Through the CLI's main() in-process: the same code path as the command, in about a second."""
    extra, setting = CLI_CASES[case]
    (tmp_path / "grid.yaml").write_text(GRID_YAML)
    run = tmp_path / "run"
    args = ["fit", "--config", digits_config, f"--run_dir={run}", *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    start = time.monotonic()
    code, err = run_main(args, cwd=tmp_path)
    assert time.monotonic() - start < 30
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # one line, at parse time
    assert setting in line and ("Not of type" in line or "Expected a typing.Literal" in line), line
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    assert not list(tmp_path.rglob("*.ckpt")) and not run.exists()  # nothing written


# --------------------------------------------------------------------- in-process

# Every __init__ argument and the type jsonargparse reads for it.
SPLIT = Literal["train", "val"]
EXPECTED_TYPES = {
    FID: {"num_samples": MetricSampleCount, "every_n_val_epochs": PositiveInt, "sample_steps": SampleSteps,
          "sampler": Sampler, "eta": ClosedUnitInterval, "batch_size": PositiveInt, "reference_split": SPLIT,
          "features": Features, "inception_weights": str | None, "feature_extractor": torch.nn.Module | None,
          "cache_dir": str | None, "seed": NonNegativeInt, "solver_order": SolverOrder},
    BitsPerDim: {"num_images": PositiveInt, "num_strata": PositiveInt, "every_n_val_epochs": PositiveInt,
                 "exact": bool, "seed": NonNegativeInt},
    ImportanceSampler: {"history_per_term": PositiveInt, "uniform_prob": ClosedUnitInterval,
                        "plot_every_n_steps": NonNegativeInt},
    SampleGrid: {"every_n_steps": PositiveInt, "num_samples": PositiveInt, "sample_steps": SampleSteps,
                 "sampler": Sampler, "seed": NonNegativeInt, "solver_order": SolverOrder},
    Sampling: {"num_samples": PositiveInt, "sample_steps": SampleSteps, "sampler": Sampler,
                   "eta": ClosedUnitInterval, "batch_size": PositiveInt, "seed": NonNegativeInt,
                   "out_dir": str | None, "solver_order": SolverOrder},
}
INT_TYPES = (PositiveInt, NonNegativeInt, MetricSampleCount)


def test_the_shared_types():
    assert SampleSteps == Union[PositiveInt, Respacing, None] and Sampler == Literal["ddpm", "ddim", "dpm_solver"]
    assert issubclass(Respacing, str) and all(issubclass(t, int) for t in INT_TYPES)
    assert issubclass(ClosedUnitInterval, float)


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_every_setting_has_the_type_jsonargparse_checks(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    hints = get_type_hints(cls.__init__)
    assert {p: hints[p] for p in params} == EXPECTED_TYPES[cls]


# (callback, argument, bad value as the command line writes it): what jsonargparse refuses.
PARSE_CASES = [
    (FID, "num_samples", "1"), (FID, "sampler", "euler"), (FID, "eta", "1.5"), (FID, "reference_split", "test"),
    (FID, "sample_steps", "-5"), (FID, "seed", "-1"),
    (BitsPerDim, "num_images", "0"), (BitsPerDim, "every_n_val_epochs", "-1"),
    (ImportanceSampler, "uniform_prob", "-0.1"), (ImportanceSampler, "history_per_term", "0"),
    (ImportanceSampler, "plot_every_n_steps", "-1"),
    (SampleGrid, "every_n_steps", "0"), (SampleGrid, "sample_steps", "ddim0"), (SampleGrid, "sampler", "DDPM"),
    (Sampling, "num_samples", "0"), (Sampling, "batch_size", "0"), (Sampling, "eta", "2"),
    (Sampling, "sample_steps", "10,0"), (Sampling, "sampler", "foo"),
]


def parser_for(cls) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "cb", skip={"feature_extractor"} if cls is FID else None)
    return parser


@pytest.mark.parametrize("cls, name, value", PARSE_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_jsonargparse_refuses_bad_values_naming_the_key(cls, name, value):
    with pytest.raises(Exception, match=rf'Parser key "cb\.{name}"'):
        parser_for(cls).parse_args([f"--cb.{name}={value}"])


@pytest.mark.parametrize("value, expected", [("100", 100), ("ddim50", "ddim50"), ("10,15,25", "10,15,25"),
                                             ("null", None)])
def test_good_sample_steps_parse(value, expected):
    assert parser_for(Sampling).parse_args([f"--cb.sample_steps={value}"]).cb.sample_steps == expected


def make(cls, **kw):
    return cls(**({"feature_extractor": TinyExtractor()} | kw)) if cls is FID else cls(**kw)


# The same refusals for Python callers, who construct the callbacks without jsonargparse.
PYTHON_CASES = [
    (FID, {"num_samples": 1}, "FID num_samples=1 must be an integer >= 4"),
    (FID, {"eta": 1.5}, "FID eta=1.5 must be a number in [0, 1]"),
    (FID, {"sampler": "euler"}, "FID sampler='euler' is not one of 'ddpm', 'ddim'"),
    (FID, {"reference_split": "test"}, "FID reference_split='test' is not one of 'train', 'val'"),
    (FID, {"sample_steps": 0}, "FID sample_steps=0 is not a respacing"),
    (FID, {"seed": -1}, "FID seed=-1 must be an integer >= 0"),
    (BitsPerDim, {"num_strata": 0}, "BitsPerDim num_strata=0 must be an integer >= 1"),
    (BitsPerDim, {"num_images": 2.5}, "BitsPerDim num_images=2.5 must be an integer >= 1"),
    (ImportanceSampler, {"uniform_prob": 2}, "ImportanceSampler uniform_prob=2 must be a number in [0, 1]"),
    (ImportanceSampler, {"plot_every_n_steps": -1}, "ImportanceSampler plot_every_n_steps=-1 must be"),
    (SampleGrid, {"every_n_steps": 0}, "SampleGrid every_n_steps=0 must be an integer >= 1"),
    (SampleGrid, {"sample_steps": "ddim-5"}, "SampleGrid sample_steps='ddim-5' is not a respacing"),
    (SampleGrid, {"sampler": "euler"}, "SampleGrid sampler='euler' is not one of"),
    (Sampling, {"num_samples": 0}, "sampling.num_samples=0 must be an integer >= 1"),
    (Sampling, {"batch_size": 0}, "sampling.batch_size=0 must be an integer >= 1"),
    (Sampling, {"eta": -0.5}, "sampling.eta=-0.5 must be a number in [0, 1]"),
    (Sampling, {"sample_steps": -3}, "sampling.sample_steps=-3 is not a respacing"),
]


@pytest.mark.parametrize("cls, kw, start", PYTHON_CASES, ids=lambda v: getattr(v, "__name__", None))
def test_python_callers_get_one_sentence_config_errors(cls, kw, start):
    with pytest.raises(ConfigError) as err:
        make(cls, **kw)
    msg = str(err.value)
    assert msg.startswith(start), msg
    assert "; set it to" in msg and "\n" not in msg and msg.count(". ") == 0  # the setting, then the fix


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_defaults_plain_python_numbers_and_numpy_ints_are_accepted(cls):
    make(cls)
    ints = {n: 5 for n, t in EXPECTED_TYPES[cls].items() if t in INT_TYPES}
    cb = make(cls, **ints)
    assert all(getattr(cb, n) == 5 for n in ints if hasattr(cb, n))
    make(cls, **{n: np.int64(4) for n in ints})
    units = {n: 1 for n, t in EXPECTED_TYPES[cls].items() if t is ClosedUnitInterval}
    make(cls, **units)  # an int in [0, 1] is a probability too
    if "sample_steps" in EXPECTED_TYPES[cls]:
        for steps in (None, 7, "7", "ddim5", "10, 15,25"):
            assert make(cls, sample_steps=steps).sample_steps == steps
