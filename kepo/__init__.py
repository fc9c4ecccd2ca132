"""kepo: KEPO post-training of vision-language models as an auditable offline pipeline."""

__version__ = "0.1.0"
