from brainenc.data.importers.base import Importer


class ThingsFmriImporter(Importer):
    name = "things-fmri"
