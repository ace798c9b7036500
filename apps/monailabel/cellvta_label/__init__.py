"""CellVTA in MONAI Label: the served bundle, tile and slide-region inference, fine-tuning on the datastore's
labels and active-learning strategies. ``apps/monailabel/main.py`` assembles them into the app."""
