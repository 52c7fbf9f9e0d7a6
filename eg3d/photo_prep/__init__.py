"""From a person's photos to an aligned, camera-labelled identity folder (eg3d/prepare_dataset.py).

photos -> faces and landmarks (dlib models shipped in `face_recognition_models`) -> a camera and a crop fitted to
the landmarks through a 3D face template (alignment) -> filters (identity, duplicates, blur, size, yaw) ->
image_N.png + dataset.json (+ latents) + prepare_report.json + contact_sheet.png.
"""
