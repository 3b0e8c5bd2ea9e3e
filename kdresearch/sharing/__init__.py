"""Results another lab can check: a run exported as a bundle (export.py), the bundle's files and
manifest (bundle.py), its model card (model_card.py)."""
