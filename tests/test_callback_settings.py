"""Every callback setting (and predict's sampling settings, and the sampler settings they share) is
typed for jsonargparse: a bad value is refused at parse time, before any model is built, with one
error naming the key; the same checks hold for Python callers (ConfigError). The CLI cases run the
CLI's main() in-process."""

from __future__ import annotations

import inspect
import re
import time
from typing import Literal, Union, get_type_hints

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveInt

from iddpm_lightning.callbacks import FID, BitsPerDim, ImportanceSampling, SampleGrid
from iddpm_lightning.diffusion import Sampler
from iddpm_lightning.diffusion.samplers import SAMPLERS, SamplerName, SolverOrder
from iddpm_lightning.sampling import Sampling
from iddpm_lightning.settings import Features, MetricSampleCount, Respacing, SampleSteps
from iddpm_lightning.errors import ConfigError

from .test_fid import TinyExtractor

CALLBACKS = [FID, BitsPerDim, ImportanceSampling, SampleGrid, Sampling, Sampler]
ADD = "--trainer.callbacks+=iddpm_lightning.callbacks."

# (what is wrong, extra arguments, the setting named in the error). digits.yaml's callbacks are
# [SampleGrid, BitsPerDim, FID]: ``--trainer.callbacks.X`` sets X of the last one.
CLI_CASES = {
    "ImportanceSampling unit interval": ([f"{ADD}ImportanceSampling", "--trainer.callbacks.uniform_prob=2"],
                                         "uniform_prob"),
    "FID choice": ([f"{ADD}FID", "--trainer.callbacks.reference_split=test"], "reference_split"),
    "BitsPerDim positive int": ([f"{ADD}BitsPerDim", "--trainer.callbacks.num_strata=0"], "num_strata"),
    "FID features choice": (["--trainer.callbacks.features=clip"], "features"),
    "FID too few samples": (["--trainer.callbacks.num_samples=3"], "num_samples"),
    "SampleGrid choice (YAML init_args)": (["--config", "{tmp}/grid.yaml"], "sampler.name"),
    "sampling choice": (["--sampling.sampler.name=foo"], "sampling.sampler.name"),
    "sampling positive int": (["--sampling.num_samples=0"], "sampling.num_samples"),
    "sampling non-positive steps": (["--sampling.sampler.steps=0"], "sampling.sampler.steps"),
}

GRID_YAML = """\
trainer:
  callbacks:
    - class_path: iddpm_lightning.callbacks.SampleGrid
      init_args:
        every_n_steps: 10
        sampler:
          name: euler
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
    FID: {"num_samples": MetricSampleCount, "every_n_val_epochs": PositiveInt, "sampler": Sampler,
          "batch_size": PositiveInt, "reference_split": SPLIT, "features": Features, "inception_weights": str | None,
          "feature_extractor": torch.nn.Module | None, "cache_dir": str | None, "seed": NonNegativeInt,
          "reference_subset": MetricSampleCount},
    BitsPerDim: {"num_images": PositiveInt, "num_strata": PositiveInt, "every_n_val_epochs": PositiveInt,
                 "exact": bool, "seed": NonNegativeInt},
    ImportanceSampling: {"history_per_term": PositiveInt, "uniform_prob": ClosedUnitInterval,
                         "plot_every_n_steps": NonNegativeInt},
    SampleGrid: {"every_n_steps": PositiveInt, "num_samples": PositiveInt, "sampler": Sampler,
                 "seed": NonNegativeInt},
    Sampling: {"num_samples": PositiveInt, "sampler": Sampler, "batch_size": PositiveInt, "seed": NonNegativeInt,
               "out_dir": str | None},
    # the sampler settings FID, SampleGrid and predict's sampling share (diffusion/samplers.py)
    Sampler: {"name": SamplerName, "steps": SampleSteps, "eta": ClosedUnitInterval, "order": SolverOrder,
              "clip": bool},
}
INT_TYPES = (PositiveInt, NonNegativeInt, MetricSampleCount)


def test_the_shared_types():
    # --help lists exactly the table's names, so a new sampler needs no edit here
    assert SampleSteps == Union[PositiveInt, Respacing, None] and SamplerName == Literal[tuple(SAMPLERS)]
    assert {"ddpm", "ddim", "dpm_solver"} <= set(SAMPLERS)
    assert SolverOrder == Literal[1, 2, 3]
    assert issubclass(Respacing, str) and all(issubclass(t, int) for t in INT_TYPES)
    assert issubclass(ClosedUnitInterval, float)


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_every_setting_has_the_type_jsonargparse_checks(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    hints = get_type_hints(cls.__init__)
    assert {p: hints[p] for p in params} == EXPECTED_TYPES[cls]


# (callback, argument, bad value as the command line writes it): what jsonargparse refuses.
PARSE_CASES = [
    (FID, "num_samples", "1"), (FID, "sampler.name", "euler"), (FID, "sampler.eta", "1.5"),
    (FID, "reference_split", "test"), (FID, "sampler.steps", "-5"), (FID, "seed", "-1"),
    (FID, "reference_subset", "3"),
    (BitsPerDim, "num_images", "0"), (BitsPerDim, "every_n_val_epochs", "-1"),
    (ImportanceSampling, "uniform_prob", "-0.1"), (ImportanceSampling, "history_per_term", "0"),
    (ImportanceSampling, "plot_every_n_steps", "-1"),
    (SampleGrid, "every_n_steps", "0"), (SampleGrid, "sampler.steps", "ddim0"), (SampleGrid, "sampler.name", "DDPM"),
    (Sampling, "num_samples", "0"), (Sampling, "batch_size", "0"), (Sampling, "sampler.eta", "2"),
    (Sampling, "sampler.steps", "10,0"), (Sampling, "sampler.name", "foo"),
    (Sampler, "name", "euler"), (Sampler, "steps", "0"), (Sampler, "eta", "-0.1"), (Sampler, "order", "4"),
]


def parser_for(cls) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "cb", skip={"feature_extractor"} if cls is FID else None)
    return parser


@pytest.mark.parametrize("cls, name, value", PARSE_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_jsonargparse_refuses_bad_values_naming_the_key(cls, name, value):
    with pytest.raises(Exception, match=rf'Parser key "cb\.{re.escape(name)}"'):
        parser_for(cls).parse_args([f"--cb.{name}={value}"])


@pytest.mark.parametrize("value, expected", [("100", 100), ("ddim50", "ddim50"), ("10,15,25", "10,15,25"),
                                             ("null", None)])
def test_good_sample_steps_parse(value, expected):
    assert parser_for(Sampling).parse_args([f"--cb.sampler.steps={value}"]).cb.sampler.steps == expected
    assert parser_for(Sampler).parse_args([f"--cb.steps={value}"]).cb.steps == expected


def make(cls, **kw):
    return cls(**({"feature_extractor": TinyExtractor()} | kw)) if cls is FID else cls(**kw)


# The same refusals for Python callers, who construct the callbacks without jsonargparse.
PYTHON_CASES = [
    (FID, {"num_samples": 1}, "FID num_samples=1 must be an integer >= 4"),
    (Sampler, {"eta": 1.5}, "sampler.eta=1.5 must be a number in [0, 1]"),
    (Sampler, {"name": "euler"}, "sampler.name='euler' is not one of 'ddpm', 'ddim'"),
    (FID, {"reference_split": "test"}, "FID reference_split='test' is not one of 'train', 'val'"),
    (Sampler, {"steps": 0}, "sampler.steps=0 is not a respacing"),
    (FID, {"seed": -1}, "FID seed=-1 must be an integer >= 0"),
    (FID, {"reference_subset": 3}, "FID reference_subset=3 must be an integer >= 4"),
    (BitsPerDim, {"num_strata": 0}, "BitsPerDim num_strata=0 must be an integer >= 1"),
    (BitsPerDim, {"num_images": 2.5}, "BitsPerDim num_images=2.5 must be an integer >= 1"),
    (ImportanceSampling, {"uniform_prob": 2}, "ImportanceSampling uniform_prob=2 must be a number in [0, 1]"),
    (ImportanceSampling, {"plot_every_n_steps": -1}, "ImportanceSampling plot_every_n_steps=-1 must be"),
    (SampleGrid, {"every_n_steps": 0}, "SampleGrid every_n_steps=0 must be an integer >= 1"),
    (Sampler, {"steps": "ddim-5"}, "sampler.steps='ddim-5' is not a respacing"),
    (Sampler, {"name": "DDPM"}, "sampler.name='DDPM' is not one of"),
    (Sampler, {"order": 4}, "sampler.order=4 is not one of 1, 2, 3"),
    (Sampling, {"num_samples": 0}, "sampling.num_samples=0 must be an integer >= 1"),
    (Sampling, {"batch_size": 0}, "sampling.batch_size=0 must be an integer >= 1"),
    (Sampler, {"eta": -0.5}, "sampler.eta=-0.5 must be a number in [0, 1]"),
    (Sampler, {"steps": -3}, "sampler.steps=-3 is not a respacing"),
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
    if "sampler" in EXPECTED_TYPES[cls]:  # the sampler settings, whole
        for steps in (None, 7, "7", "ddim5", "10, 15,25"):
            assert make(cls, sampler=Sampler(steps=steps)).sampler.steps == steps
    if "steps" in EXPECTED_TYPES[cls]:
        for steps in (None, 7, "7", "ddim5", "10, 15,25"):
            assert make(cls, steps=steps).steps == steps
