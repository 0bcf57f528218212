"""SAM 2 / 2.1 (Hiera image encoder, memory) written in this project; loads the original checkpoints."""
