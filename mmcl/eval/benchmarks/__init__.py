"""The community's zero-shot benchmarks read from local copies in their released layouts, one file each
(ESC-50, UrbanSound8K, AudioSet, VGGSound, UCF101, Kinetics-400, AudioCaps, Clotho, MSR-VTT 1k-A); their
protocols, class-name cleaning, templates and fixed class lists are data files under
``configs/eval/benchmarks/``. ``mmcl eval --suite <name> --data PATH`` runs one, ``--suite standard --data
NAME=PATH ...`` several (:mod:`mmcl.eval.benchmarks.runner`)."""

from mmcl.eval.benchmarks import (  # noqa: F401  (each registers its benchmark)
    audiocaps,
    audioset,
    clotho,
    esc50,
    kinetics400,
    msrvtt,
    ucf101,
    urbansound8k,
    vggsound,
)
from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, benchmark_names, clean_name, get_benchmark, register_benchmark
from mmcl.eval.benchmarks.runner import run_benchmark, run_standard, standard_table

__all__ = ["Benchmark", "Clip", "Manifest", "benchmark_names", "clean_name", "get_benchmark", "register_benchmark",
           "run_benchmark", "run_standard", "standard_table"]
