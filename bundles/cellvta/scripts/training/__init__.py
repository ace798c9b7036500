"""Training: HoVer-Net losses and the glue that runs them in MONAI's Ignite workflows."""
