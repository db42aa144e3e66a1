"""Images in: folders, archives, digits, IDX, regression targets; decoded once and cached."""
