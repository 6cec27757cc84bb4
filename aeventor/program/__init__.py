"""A program's definition as data: the model, expressions, host rules and validation."""
