"""The loop's steps, one module each, in the order ``backend.loop.run_loop`` runs them (DESIGN.md section 1).

    cameras    0   captures with cameras (SfM where missing), trajectory, working size
    memory     1   the point memory M from the posed captures (a geometry estimator by name)
    guide      1b  Gaussians on the captures alone (on CUDA a mean of 3 fits), rendered for the generator (ours)
    segments   2   the trajectory cut into segments
    retrieval  3   the captures that cover a segment
    render     4   M splatted into cameras: colour, depth, mask, source
    generate   5   the segment's frames from its condition video (a generator by name)
    update     6   generated frames lifted into M
    fit        7   3D Gaussians on captures and generated frames

Each step is a few functions over the typed data of :mod:`backend.types` and a frozen config of its own.
"""
