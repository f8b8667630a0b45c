"""What a teleport optimises: the objectives, the geometric ones (sharpness,
orbit curvature) and the stability constraint.

May import: ``core``, ``symmetries`` (and ``discovery``, below it in the
order, which it does not use).
"""
