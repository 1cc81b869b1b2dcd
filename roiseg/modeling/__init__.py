"""The decoders (ROIAlign, global context, the mean-shape prior), their checkpoints, and which device
they run on."""
