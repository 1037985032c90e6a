"""edgepack.targets"""
