"""Helpers shared by the structured pruning passes (layer_prune, width_prune) and encoder distillation:
calibration inputs per kind of model, a block-by-block walk of any family, unit costs, importance and compensation."""
