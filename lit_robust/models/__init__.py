"""LightningModules of the methods and the networks they share (timm keywords: ``num_classes``, ``in_chans``, ``img_size``)."""
