"""slmops: fine-tune, align and ship small language models with Microsoft Olive as the engine."""

__version__ = "0.1.0"
