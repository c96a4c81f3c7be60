"""nnU-Net trainer classes found by nnunetv2 through ``nnUNet_extTrainer=<this directory>``."""
