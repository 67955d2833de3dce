"""Small OS helpers: ioctl calls and their numbers, memfd, eventfd."""
