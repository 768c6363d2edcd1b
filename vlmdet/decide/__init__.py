"""Deciding whether a model is published: COCO mAP (metrics.py), the paired bootstrap over images
(bootstrap.py), the champion/challenger gate (gate.py) and how the champion is measured on today's
images (champion.py). Pure functions over records: no model is loaded and nothing is read from a target here."""
