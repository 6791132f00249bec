"""Datasets: built-in synthetic faces and image folders, as uint8 tensors."""
