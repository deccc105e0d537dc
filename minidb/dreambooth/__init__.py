"""The DreamBooth trainer: the run's plan, its data and class prior, the training step (loss scaling,
the fused backward step, 8-bit AdamW), the run folder and its checkpoints, several processes.
Start at train.py (docs/READING.md gives the order)."""
