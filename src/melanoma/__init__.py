"""melanoma: config-driven training and evaluation of benign-vs-malignant skin-lesion classifiers."""

__version__ = "0.1.0"
