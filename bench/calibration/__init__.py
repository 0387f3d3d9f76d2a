"""Calibration corpus: healthy training runs of third-party model families, to count lightwatch's false alarms.

Every run here is healthy by construction (a usual recipe of its family, random initialisation, data that
can be learned), and each record shows it: first and final training loss, and a validation metric before
and after training. So every warning+ alert lightwatch raises on this corpus is a false alarm.

Run it from the repository root, in its own venv (``make calibration`` builds ``.venv-calibration``):

    OMP_NUM_THREADS=1 .venv-calibration/bin/python -m bench.calibration --jobs 2
        [--families a,b] [--seeds 0-9] [--modes default,callbacks,strict] [--max-steps N]
        [--out outputs/calibration] [--json] [--info] [--list]

Modes: ``default`` and ``strict`` are lightwatch's Hydra policies ``monitor=default`` / ``monitor=strict``
(composed through ``lightwatch.conf`` and built with ``lightwatch.hydra.instantiate_monitors``, as
``bench/diagnosis.py`` does); ``callbacks`` is the five callbacks with default arguments
(``GradientStatsMonitor()``, ``ActivationStatsMonitor()``, ``DataQualityMonitor()``, ``MetricMonitor()``,
``MetricCheckpoint(dirpath=<run_dir>/ckpt)``).

Families (``bench.calibration.families.FAMILIES``; ``--list`` prints them with their recipes):

==========================  ==========================================================  =============
family                      what                                                        held out
==========================  ==========================================================  =============
resnet_bn                   torchvision resnet18 (BatchNorm), SGD momentum + cosine     seeds >= 5
vit_timm                    timm ViT-tiny (depth 2, patch 4 on 16x16), AdamW + warmup   seeds >= 5
convnext_timm               timm convnext_atto, AdamW + warmup + cosine                 whole family
gpt2_hf                     HF GPT2LMHeadModel (tiny config), dynamic padding           seeds >= 5
bert_hf                     HF BertForSequenceClassification (tiny), dynamic padding    whole family
lightning_transformer       Lightning demo LightningTransformer on generated tokens     seeds >= 5
lightning_lstm              Lightning demo LightningLSTM (carried hidden state, clip)   seeds >= 5
lightning_boring            Lightning BoringModel as is                                 seeds >= 5
rnn_clip                    LSTM / GRU on digit rows, gradient_clip_val=1.0             seeds >= 5
gan_manual                  GAN, manual optimisation, two optimizers                    seeds >= 5
regression_mse              MLP regression, MSE, diabetes                               seeds >= 5
teacher_student             slowly learning student of a random teacher MLP             seeds >= 5
plain_tensor_batch          autoencoder, batches are plain tensors                      seeds >= 5
finetune                    small CNN pre-trained in-process, fine-tuned, new head      whole family
==========================  ==========================================================  =============

Tuning and held-out split (keep it, or the false-alarm numbers stop meaning anything):

- **tuning** (thresholds may be set by looking at these): seeds 0-4 of resnet_bn, vit_timm, gpt2_hf,
  lightning_transformer, lightning_lstm, rnn_clip, teacher_student, regression_mse, gan_manual,
  plain_tensor_batch, lightning_boring;
- **held out** (look only to measure, after a change is made): every seed >= 5 of those families, and the
  whole families convnext_timm, bert_hf and finetune. lightning_lstm was held out until its false alarm
  (`update_ratio_high` on its decoder, SGD at lr 20) shaped the median rule; it is a tuning family since.

Each record says ``held_out``; the report gives totals for both sides.

Output: one JSON record per run in ``<out>/runs/<mode>/<family>/seed<k>.json`` (alerts read back from the
run's ``alerts.jsonl``; a crash is recorded with its traceback), TensorBoard logs in ``<out>/logs/...``,
``<out>/results.json`` with the summary, and printed tables. "loss first->last" is the mean training loss
of the first 5 batches -> of the last 10 batches (median over seeds); the metric is computed outside the
Trainer, on the validation split, before and after training.

torchvision and timm need ``bench/calibration/torchvision_compat.py`` next to the CPU torch build: it is
imported first, here and in every worker process.
"""
from . import torchvision_compat  # noqa: F401  (must come first: before anything imports torchvision)
from .families import FAMILIES, HELD_OUT_FROM_SEED, TUNING_FAMILIES, Built, Family, is_held_out  # noqa: E402
from .runner import MODES, mode_callbacks, policy_callbacks, run_one  # noqa: E402

__all__ = ["FAMILIES", "HELD_OUT_FROM_SEED", "MODES", "TUNING_FAMILIES", "Built", "Family", "is_held_out",
           "mode_callbacks", "policy_callbacks", "run_one"]
