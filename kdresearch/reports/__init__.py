"""Reading results: comparison tables and figures, evaluation of a trained model."""
