"""A fault suite for lightwatch: small CPU models on scikit-learn's digits, healthy and broken on purpose.

Import it with the repository root on ``sys.path`` (the one supported style)::

    from bench.faults import FAULTS, HEALTHY, get_fault

    run = get_fault("dead_relu").build(seed=0)           # model, datamodule, Trainer arguments
    trainer = run.trainer("/tmp/run", callbacks=[...])   # the fault's own callbacks go first
    trainer.fit(run.model, datamodule=run.datamodule)

``python bench/diagnosis.py`` runs the whole suite against lightwatch's default policy and Lightning's
built-ins; see docs/fault-evaluation.md.
"""
from .data import CENTRE_FEATURES, CLASSES, FEATURES, DataSpec, DigitsData, load_digits_tensors
from .injections import LRSpike
from .models import DigitsClassifier, PartialSoftmax, accuracy, build_net
from .signals import (
    SIGNALS,
    SignalObserver,
    SignalSpec,
    model_info,
    read_alerts,
    read_scalars,
    run_signals,
    scan_splits,
    signal_locations,
)
from .suite import (
    BASES,
    FAULTS,
    HEALTHY,
    KINDS,
    Fault,
    FaultRun,
    Location,
    Recipe,
    base_recipe,
    get_fault,
    healthy_base,
)

__all__ = [
    "BASES",
    "CENTRE_FEATURES",
    "CLASSES",
    "FAULTS",
    "FEATURES",
    "HEALTHY",
    "KINDS",
    "SIGNALS",
    "DataSpec",
    "DigitsClassifier",
    "DigitsData",
    "Fault",
    "FaultRun",
    "LRSpike",
    "Location",
    "PartialSoftmax",
    "Recipe",
    "SignalObserver",
    "SignalSpec",
    "accuracy",
    "base_recipe",
    "build_net",
    "get_fault",
    "healthy_base",
    "load_digits_tensors",
    "model_info",
    "read_alerts",
    "read_scalars",
    "run_signals",
    "scan_splits",
    "signal_locations",
]
