"""edgepack.kernels"""
