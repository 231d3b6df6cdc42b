"""Studies of an edit: evaluation, baselines, spurious-correlation probes, segmentation, stylization, reports."""
