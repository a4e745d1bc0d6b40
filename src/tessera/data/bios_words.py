"""Word lists for the synthetic-biography testbed (:mod:`tessera.data.bios`), written for this project.

First and last names are common given names and surnames; universities and companies are
invented names (any resemblance to a real institution is accidental); cities are real
place names, but every person, and every combination of attributes, is fictional.
"""

from __future__ import annotations

FIRST_NAMES_FEMALE = (
    "Alice", "Beatrice", "Clara", "Daphne", "Elena", "Fiona", "Greta", "Hannah", "Iris", "Julia",
    "Karin", "Lena", "Mara", "Nadia", "Olivia", "Paula", "Rosa", "Sofia", "Tessa", "Ursula",
    "Vera", "Wanda", "Yara", "Zoe", "Agnes", "Bianca", "Cecilia", "Dora", "Edith", "Flora",
    "Gloria", "Helena", "Ingrid", "Joanna", "Laura", "Miriam", "Nora", "Petra", "Ruth", "Selma",
)
FIRST_NAMES_MALE = (
    "Adrian", "Bruno", "Carl", "Daniel", "Edgar", "Felix", "Gustav", "Hugo", "Ivan", "Jonas",
    "Karl", "Lucas", "Marco", "Nils", "Oscar", "Pablo", "Quentin", "Rafael", "Simon", "Tobias",
    "Victor", "Walter", "Xavier", "Yusuf", "Anton", "Boris", "Cyril", "Dmitri", "Emil", "Frank",
    "George", "Henry", "Isaac", "Jakob", "Leon", "Martin", "Otto", "Peter", "Roland", "Stefan",
)
MIDDLE_NAMES = (
    "Ann", "Beth", "Claire", "Jane", "Lee", "Marie", "Rae", "Sue", "Kay", "Lynn",
    "James", "John", "Paul", "Ray", "Dean", "Roy", "Jay", "Glen", "Neil", "Troy",
)
LAST_NAMES = (
    "Abbott", "Bauer", "Castillo", "Dalton", "Eriksen", "Fischer", "Garner", "Hartley", "Iverson", "Jensen",
    "Keller", "Lindqvist", "Moreau", "Novak", "Olsen", "Pereira", "Quinlan", "Romero", "Sandberg", "Thorne",
    "Ulrich", "Vance", "Whitfield", "Yamada", "Zeller", "Albers", "Brennan", "Costa", "Delaney", "Engel",
    "Ferreira", "Gallagher", "Holm", "Ingram", "Jovanovic", "Kowalski", "Larsen", "Marsh", "Nakamura", "Ortega",
    "Petrov", "Ramsey", "Schulz", "Tanaka", "Underwood", "Varga", "Weber", "Young", "Zimmer", "Adler",
)
CITIES = (
    "Lyon", "Porto", "Bergen", "Graz", "Tampere", "Leeds", "Cork", "Bilbao", "Turin", "Utrecht",
    "Krakow", "Brno", "Ghent", "Aarhus", "Malmo", "Basel", "Dresden", "Seville", "Nantes", "Bologna",
    "Halifax", "Tucson", "Memphis", "Omaha", "Spokane", "Adelaide", "Dunedin", "Osaka", "Busan", "Cusco",
    "Quito", "Rosario", "Mombasa", "Tangier", "Izmir", "Riga", "Tartu", "Plovdiv", "Split", "Salzburg",
)
UNIVERSITIES = (
    "Northbrook University", "Ravenshaw Institute of Technology", "Eastmoor College", "Silverlake University",
    "Halden Polytechnic", "Westgate University", "Brightwater College", "Ashford Institute", "Kingsmere University",
    "Oakridge Technical University", "Marlow University", "Stonefield College", "Greyhaven University",
    "Larchmont Institute", "Whitcombe University", "Elmstead College", "Fairholt University", "Copperfield Institute",
    "Redcliff University", "Thornbury College", "Millbrook Polytechnic", "Hollowell University", "Castleton Institute",
    "Pinecrest University", "Duncombe College",
)
MAJORS = (
    "Physics", "Chemistry", "Biology", "Mathematics", "Computer Science", "Economics", "History", "Philosophy",
    "Linguistics", "Geology", "Astronomy", "Architecture", "Civil Engineering", "Mechanical Engineering",
    "Electrical Engineering", "Psychology", "Sociology", "Statistics", "Music", "Political Science",
    "Anthropology", "Marine Biology", "Materials Science", "Neuroscience", "Art History",
)
COMPANIES = (
    "Veltrix Systems", "Orbital Foods", "Nordhaven Energy", "Brightpath Logistics", "Kestrel Dynamics",
    "Quillon Software", "Amberline Pharma", "Tidewater Shipping", "Corvane Analytics", "Halcyon Robotics",
    "Pemberton Textiles", "Lumora Optics", "Granite Peak Bank", "Solvane Chemicals", "Ironleaf Publishing",
    "Mistral Aerospace", "Zephyr Telecom", "Oakhurst Insurance", "Bluefjord Media", "Sablewood Furniture",
    "Crestline Motors", "Vireo Biotech", "Harbourline Travel", "Novacore Materials", "Wrenfield Games",
    "Palisade Capital", "Greenmarsh Farms", "Torvik Steel", "Elderberry Studios", "Quarrystone Construction",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
