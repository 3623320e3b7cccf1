"""Gymnasium environments on pybullet. Imported only through gymnasium entry-point strings."""
