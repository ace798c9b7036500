"""Cell classifiers on frozen per-cell embeddings: embeddings, labels, classifier, workflows."""
