"""edgepack.compressor"""
