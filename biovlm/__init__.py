"""biovlm: prompt learning on frozen biomedical vision-language models, benchmarked on MedMNIST+.

The library knows nothing of DVC; ``stages/`` holds the thin entry points of the pipeline.
"""

__version__ = "0.1.0"
