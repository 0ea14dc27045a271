"""raydefense's benchmark suite (GitHub issue 14); ``python bench/run.py`` runs it.

Modules: :mod:`.stats` (medians, interleaved timing, paired ratios), :mod:`.results` (rows, the
printed table, the JSON file), one module per section: :mod:`.attacks` (1, against torchattacks),
:mod:`.ray_stages` (2, the Ray Data attack stage; 3, Ray Train), :mod:`.throughput` (4, UDDN / GNR
training and defended-model evaluation), :mod:`.default_run` (5, the default run's stages),
:mod:`.gpu` (6, bf16 and model FLOP utilisation, CUDA only), and :mod:`.cli` (the command).

Everything measured is the project's own code (models and attacks registries, losses, loops, the
Ray Data actor and the Ray Train plumbing); the suite adds only timing around it.
"""
