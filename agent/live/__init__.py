"""The feedback-trap loop: frames in, detections, policy, commands out."""
