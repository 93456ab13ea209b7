# A benchmark's local Ray listens on 127.0.0.1 only; Ray reads the switch when first imported.
from distgan.data import local_ray_on_loopback

local_ray_on_loopback()
