"""What a run tells about itself: its metric records, expert-load heatmaps and tables."""
