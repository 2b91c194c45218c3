"""cloud-init templates per pillar (package data; rendered by provision/render.py)."""
