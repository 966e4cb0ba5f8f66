"""The HTTP edge: quart-trio routes over one shared preprocessing path."""
