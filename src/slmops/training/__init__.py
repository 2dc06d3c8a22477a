"""Training: recipe -> data -> Olive config -> fine-tune (one or many processes), sweeps, the runs index."""
