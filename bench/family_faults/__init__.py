"""The fault suite extended to three model families of the calibration corpus (a transformer LM, a CNN with
BatchNorm, a recurrent classifier), and lightwatch's recall on them.

Run it from the repository root, in the main venv::

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.family_faults --jobs 2 [--families gpt2_hf,cnn_bn,rnn_clip]
        [--faults all] [--seeds 0-4] [--out outputs/family_faults] [--markdown FILE] [--keep-logs]

Each (family, fault, seed) is the family's healthy run of that seed (``bench.calibration.families``, or
:func:`bench.family_faults.cases.build_cnn_bn`) with one fault planted (:mod:`bench.family_faults.cases`),
trained under lightwatch's ``default`` Hydra policy, plus the measurement-only
:class:`bench.family_faults.probe.FaultProbe`. Healthy controls (fault ``healthy``) use the same seeds.
"""
from .cases import FAMILIES, FAULTS, HARM_RULE, Case, FamilyFault, FamilySpec, build_case, fault_names, faults_for

__all__ = ["FAMILIES", "FAULTS", "HARM_RULE", "Case", "FamilyFault", "FamilySpec", "build_case", "fault_names",
           "faults_for"]
