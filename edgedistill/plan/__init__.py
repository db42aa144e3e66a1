"""Planning: FLOPs and layers, the roofline, factors fitted to published boards, estimates."""
