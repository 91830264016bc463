"""Program and capture: the model handle, the static-shape encoder and decoder forwards, token merging, torch.export capture."""
