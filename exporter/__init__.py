"""edgepack.exporter"""
