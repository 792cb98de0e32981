"""Explanation commands (`explain saliency|influence|units`)."""
