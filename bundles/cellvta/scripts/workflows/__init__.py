"""Running the bundle's workflows: which config files make each workflow, the built-in demo data, and a
command line (``python -m scripts.workflows``) that refuses unknown override keys and reports config errors
in one line."""
