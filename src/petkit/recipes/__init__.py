"""Shipped YAML recipes (package data): `petkit train --recipe <name>` or `load_recipe(name)`."""
