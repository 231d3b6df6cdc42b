"""Models and data: the classifier registry, preprocessing, class names, image files and folders."""
