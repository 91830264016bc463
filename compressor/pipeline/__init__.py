"""The pipeline: typed passes, the pass manager, recipes, and recipe-to-artifact builds."""
