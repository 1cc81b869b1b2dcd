"""Training batches from the feature store: the batch sources (streamed, resident, pinned), the ROI
sampling and jitter, and the mask targets cut from packed instance masks."""
